"""A read-only view of a published plan for the data plane: routing, group specs, placement.

Routing derives from the groups themselves (a group serves ``(model, cut)`` for every cut in its
``cuts``), so it needs nothing from the plan's ``routes`` hint. When budget classes put one
``(model, cut)`` into several groups, a request goes to the loosest group whose ``min_budget_ms`` its
own budget still covers (bigger batches), else to the tightest group. A cut no group lists (traffic
the plan has not seen yet) joins the group of its model that starts nearest below it, else the
model's first group: every replica holds its whole model, so any group can run any cut.

Liveness (``Serving``, from the replica registry's statuses): which group streams a live replica reads
now, and the latency ratios the replicas measure. ``choose`` routes to the plan's group when a live
replica reads its stream, else to the nearest live group of the same model (a takeover is under way),
else nowhere; the ingress switches to a new plan once ``unserved`` is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    latency_table_ms: tuple[float, ...] = ()  # L(b) for b = 1..batch at the group's traffic mix, as planned

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
                latency_table_ms=tuple(float(x) for x in g.get("latency_table_ms") or ()),
            )
            self.groups[spec.id] = spec
        self._routes: dict[tuple[str, int], list[GroupSpec]] = {}
        for spec in self.groups.values():
            for c in spec.cuts:
                self._routes.setdefault((spec.model, c), []).append(spec)
        for cands in self._routes.values():
            cands.sort(key=lambda s: (s.min_budget_ms, s.id))
        self.models = frozenset(s.model for s in self.groups.values())
        scale = plan.get("latency_scale") or {}
        self.latency_scale: dict[str, float] = (
            {str(m): float(f) for m, f in scale.items() if isinstance(f, int | float) and f > 0}
            if isinstance(scale, Mapping) else {})

    def route(self, model: str, cut: int, budget_ms: float) -> GroupSpec | None:
        cands = self._routes.get((model, cut))
        if not cands:
            return None
        fitting = [s for s in cands if s.min_budget_ms <= budget_ms]
        return fitting[-1] if fitting else cands[0]

    def resolve(self, model: str, cut: int, budget_ms: float) -> GroupSpec:
        """``route``, and a cut no group lists joins the group of that model that starts nearest below it,
        else the model's lowest group (replicas hold the whole model, so any group runs any cut).
        Raises ``BadCut`` only when the plan has no group of ``model`` (callers check the model first)."""
        spec = self.route(model, cut, budget_ms)
        if spec is not None:
            return spec
        mine = [s for s in self.groups.values() if s.model == model]
        if not mine:
            raise BadCut(f"cut {cut} of {model} is not served by plan epoch {self.epoch}",
                         model=model, cut=cut, epoch=self.epoch)
        below = [s for s in mine if s.min_cut <= cut] or [s for s in mine if s.min_cut == min(x.min_cut for x in mine)]
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


# ------------------------------------------------------------------------------- who serves what now

MIN_SAMPLES = 5  # batches a replica must have measured before its ratio counts


@dataclass(frozen=True, slots=True)
class Serving:
    readers: dict[str, int] = field(default_factory=dict)  # stream -> live serving replicas reading it
    ratios: dict[str, list[float]] = field(default_factory=dict)  # active stream -> measured ratios

    def live(self, stream: str) -> int:
        return self.readers.get(stream, 0)


def serving_from(statuses: Iterable[Mapping[str, Any]]) -> Serving:
    readers: dict[str, int] = {}
    ratios: dict[str, list[float]] = {}
    for s in statuses:
        if s.get("state") != "serving":
            continue
        streams = s.get("streams")
        if not isinstance(streams, list):
            continue
        for stream in streams:
            if isinstance(stream, str):
                readers[stream] = readers.get(stream, 0) + 1
        lat = s.get("latency")
        if streams and isinstance(lat, Mapping) and lat.get("source") == "profile":
            ratio, samples = lat.get("ratio"), lat.get("samples")
            if isinstance(ratio, int | float) and ratio > 0 and isinstance(samples, int) and samples >= MIN_SAMPLES:
                active = streams[0]  # the active group's stream comes first
                if isinstance(active, str):
                    ratios.setdefault(active, []).append(float(ratio))
    return Serving(readers, ratios)


def choose(view: PlanView, serving: Serving, model: str, cut: int, budget_ms: float) -> GroupSpec | None:
    """The group to route to: the plan's (``PlanView.resolve``) if it has a live replica, else the
    nearest live group of the model; None when no replica of ``model`` is alive."""
    planned = view.resolve(model, cut, budget_ms)
    if serving.live(view.stream(planned.id)):
        return planned
    live = [s for s in view.groups.values() if s.model == model and serving.live(view.stream(s.id))]
    if not live:
        return None
    below = [s for s in live if s.min_cut <= cut]
    pool = below or live
    return max(pool, key=lambda s: (s.min_cut if below else -s.min_cut, s.min_budget_ms <= budget_ms, s.id))


def unserved(view: PlanView, serving: Serving) -> list[str]:
    """Group ids of ``view`` whose stream no live replica reads yet."""
    return sorted(gid for gid in view.groups if not serving.live(view.stream(gid)))
