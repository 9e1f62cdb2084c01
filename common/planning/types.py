"""The planner's data: fragments in (the workload file), groups and plans out (the plan file).

Workload file::

    {"fragments": [{"id": "c17", "model": "resnet50", "cut": 4, "rate_rps": 5.0, "budget_ms": 80.0}, ...]}

Plan file (design.md sections 1 and 4)::

    {"epoch": 3, "policy": "graft", "profile": "v100-estimated", "rho": 0.9,
     "groups": [{"id": "resnet50-g0", "model": "resnet50", "fragments": ["c17", ...], "cuts": [4, 7],
                 "batch": 8, "share": 30, "replicas": 2, "latency_ms": 21.3,
                 "rate_rps": 55.0, "min_budget_ms": 62.0}, ...],
     "infeasible": [{"id": "c9", "reason": "..."}],
     "placement": [{"device": "gpu0", "replicas": [{"group": "resnet50-g0", "share": 30}, ...]}, ...],
     "routes": {"resnet50:4": "resnet50-g0",
                "resnet50:7": [{"group": "resnet50-g1", "min_budget_ms": 40.0},
                               {"group": "resnet50-g0", "min_budget_ms": 62.0}]},
     "total_share": 60, "gpus": 1}

Routes. A ``(model, cut)`` served by one group maps to that group's id. Budget classes can put one
``(model, cut)`` into several groups; then the route is a list sorted by ``min_budget_ms``, where
``min_budget_ms`` is the smallest budget among *that (model, cut)'s* fragments in the group (not the
group's overall minimum, which another cut may set). A request with budget ``T`` goes to the last
entry whose ``min_budget_ms <= T`` (the loosest class it belongs to: bigger batches), or to the first
entry when ``T`` is below all of them. Ingress may equally derive routes from ``groups``; the hint
exists so that the budget-class boundaries are explicit.

A fragment with rate 0 is still served (a group always has at least one replica). The expected batch
composition ``n_c = B · Λ_c / Λ`` is undefined when ``Λ = 0``; the planner and ``verify`` then count
each member cut equally.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLICIES = ("graft", "per-cut", "oracle")

# Section 4: shares on one GPU sum to at most 100 (MPS active-thread percentages), and MPS serves at
# most 48 client processes per GPU.
GPU_CAPACITY = 100
MAX_CLIENTS_PER_DEVICE = 48


class PlanningError(ValueError):
    """A workload or plan is malformed, or a policy cannot handle the instance it was given."""


@dataclass(frozen=True, slots=True)
class Fragment:
    """``(model, cut)`` as the server sees it, with an arrival rate and a server-side budget."""

    id: str
    model: str
    cut: int
    rate_rps: float
    budget_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "cut": self.cut, "rate_rps": self.rate_rps,
                "budget_ms": self.budget_ms}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fragment:
        try:
            frag = cls(id=str(d["id"]), model=str(d["model"]), cut=int(d["cut"]),
                       rate_rps=float(d["rate_rps"]), budget_ms=float(d["budget_ms"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanningError(f"bad fragment {dict(d)!r}: {exc}") from None
        if not (math.isfinite(frag.rate_rps) and frag.rate_rps >= 0):
            raise PlanningError(f"fragment {frag.id!r}: rate_rps must be finite and >= 0")
        if not math.isfinite(frag.budget_ms):
            raise PlanningError(f"fragment {frag.id!r}: budget_ms must be finite")
        return frag


@dataclass(frozen=True, slots=True)
class Group:
    """Fragments of one model served together by ``replicas`` workers of ``(batch, share)`` each."""

    id: str
    model: str
    fragments: tuple[str, ...]
    cuts: tuple[int, ...]
    batch: int
    share: int
    replicas: int
    latency_ms: float
    rate_rps: float
    min_budget_ms: float
    latency_table_ms: tuple[float, ...] = ()  # L(b), b = 1..batch, at the group's expected composition
    spares: int = 0  # of ``replicas``, how many are spares (N+1): serving, but not needed for the rate

    @property
    def cost(self) -> int:
        return self.replicas * self.share

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "fragments": list(self.fragments),
                "cuts": list(self.cuts), "batch": self.batch, "share": self.share,
                "replicas": self.replicas, "latency_ms": self.latency_ms, "rate_rps": self.rate_rps,
                "min_budget_ms": self.min_budget_ms, "latency_table_ms": [round(x, 4) for x in self.latency_table_ms],
                "spares": self.spares}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Group:
        return cls(id=str(d["id"]), model=str(d["model"]),
                   fragments=tuple(str(f) for f in d["fragments"]),
                   cuts=tuple(int(c) for c in d["cuts"]), batch=int(d["batch"]), share=int(d["share"]),
                   replicas=int(d["replicas"]), latency_ms=float(d["latency_ms"]),
                   rate_rps=float(d.get("rate_rps", 0.0)), min_budget_ms=float(d.get("min_budget_ms", 0.0)),
                   latency_table_ms=tuple(float(x) for x in d.get("latency_table_ms") or ()),
                   spares=int(d.get("spares", 0) or 0))


@dataclass(frozen=True, slots=True)
class Infeasible:
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DevicePlacement:
    """Replicas on one device, as ``(group id, share)`` pairs in placement order."""

    device: str
    replicas: tuple[tuple[str, int], ...]

    @property
    def used(self) -> int:
        return sum(s for _, s in self.replicas)


Route = str | list[dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    epoch: int
    policy: str
    profile: str
    rho: float
    groups: tuple[Group, ...]
    infeasible: tuple[Infeasible, ...]
    placement: tuple[DevicePlacement, ...]
    routes: dict[str, Route] = field(default_factory=dict)

    @property
    def total_share(self) -> int:
        return sum(g.cost for g in self.groups)

    @property
    def required_share(self) -> int:
        """The share the load needs: every replica but the spares (N+1, headroom on an owned host)."""
        return sum((g.replicas - g.spares) * g.share for g in self.groups)

    @property
    def gpus(self) -> int:
        return len(self.placement)

    def group(self, gid: str) -> Group:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "policy": self.policy, "profile": self.profile, "rho": self.rho,
            "groups": [g.to_dict() for g in self.groups],
            "infeasible": [{"id": i.id, "reason": i.reason} for i in self.infeasible],
            "placement": [{"device": d.device, "replicas": [{"group": g, "share": s} for g, s in d.replicas]}
                          for d in self.placement],
            "routes": self.routes, "total_share": self.total_share, "required_share": self.required_share,
            "gpus": self.gpus,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Parse a plan file. Reported totals are recomputed; ``verify`` compares them with the file."""
        try:
            return cls(
                epoch=int(d["epoch"]), policy=str(d["policy"]), profile=str(d.get("profile", "")),
                rho=float(d["rho"]), groups=tuple(Group.from_dict(g) for g in d["groups"]),
                infeasible=tuple(Infeasible(str(i["id"]), str(i["reason"])) for i in d.get("infeasible", [])),
                placement=tuple(
                    DevicePlacement(str(p["device"]),
                                    tuple((str(r["group"]), int(r["share"])) for r in p["replicas"]))
                    for p in d.get("placement", [])),
                routes=dict(d.get("routes", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanningError(f"malformed plan: {type(exc).__name__}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def load_plan_dict(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanningError(f"cannot read plan {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PlanningError(f"plan {path} is not a JSON object")
    return data


# --------------------------------------------------------------------------------------- workload I/O

def workload_from_dict(d: Mapping[str, Any]) -> list[Fragment]:
    try:
        raw = d["fragments"]
    except (KeyError, TypeError):
        raise PlanningError("a workload is an object with a 'fragments' list") from None
    frags = [Fragment.from_dict(f) for f in raw]
    check_unique_ids(frags)
    return frags


def check_unique_ids(fragments: Iterable[Fragment]) -> None:
    seen: set[str] = set()
    for f in fragments:
        if f.id in seen:
            raise PlanningError(f"fragment id {f.id!r} appears twice in the workload")
        seen.add(f.id)


def workload_to_dict(fragments: Sequence[Fragment]) -> dict[str, Any]:
    return {"fragments": [f.to_dict() for f in fragments]}


def load_workload(path: str | Path) -> list[Fragment]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanningError(f"cannot read workload {path}: {exc}") from None
    return workload_from_dict(data)


def save_workload(path: str | Path, fragments: Sequence[Fragment]) -> None:
    Path(path).write_text(json.dumps(workload_to_dict(fragments), indent=1) + "\n")
